"""Device heterogeneity: profiles, fleet generators and the virtual clock (SPEC 4)."""

from amble.fleet.clock import RoundTiming, StepTime, VirtualClock, calibrate
from amble.fleet.profiles import DeviceProfile, generate_fleet, load_trace

__all__ = ["DeviceProfile", "RoundTiming", "StepTime", "VirtualClock", "calibrate", "generate_fleet", "load_trace"]
