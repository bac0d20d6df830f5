"""On-demand backends: started when traffic calls for them, stopped when idle.

Two layers:

* :class:`BackendScaler` (machine.py) is the state machine of one backend, pure and driven by
  an explicit clock; machine.py draws its states and says what triggers a start.

* :class:`Scaler` (driver.py) drives the machines: runs actuators, polls readiness, holds or diverts
  requests while a backend starts (`cold_start: wait | fallback`), stops idle backends,
  keeps the GPU memory budget of each host (evicting idle lower-priority backends first, or
  refusing with the reason), and coordinates proxy processes that share a database through
  Postgres advisory locks and a shared last-activity table.
"""


from .actuators import Actuator, ActuatorError, Commands, DockerEngine, is_ready, make_actuator
from .coordination import Coordinator, HostCoordinator, LocalCoordinator, PostgresCoordinator
from .driver import Scaler
from .machine import STATES, BackendScaler, ScalerState, Verdict
from .planner import Plan, plan_start

__all__ = [
    "STATES", "Actuator", "ActuatorError", "BackendScaler", "Commands", "Coordinator", "DockerEngine", "HostCoordinator",
    "LocalCoordinator", "Plan", "PostgresCoordinator", "Scaler", "ScalerState", "Verdict", "is_ready", "make_actuator",
    "plan_start",
]
