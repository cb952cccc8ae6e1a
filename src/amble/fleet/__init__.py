"""Device heterogeneity: profiles, fleet generators and the virtual clock (SPEC 4)."""

from amble.fleet.clock import RoundTiming, VirtualClock, calibrate
from amble.fleet.profiles import DeviceProfile, generate_fleet, load_trace
from amble.fleet.steptime import StepTime

__all__ = ["DeviceProfile", "RoundTiming", "StepTime", "VirtualClock", "calibrate", "generate_fleet", "load_trace"]
