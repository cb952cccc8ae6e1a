"""The live path: ``amble serve`` puts one strategy's parameter server behind an HTTP gateway for real
devices; the coordinator plays its rounds on the wall clock (the simulator's counterpart is ``sim``)."""
