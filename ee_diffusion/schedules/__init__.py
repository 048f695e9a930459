from .calibration import Calibration, PlanPoint, calibrate_plan
from .exit_schedule import REUSE, ExitSchedule

__all__ = ["REUSE", "Calibration", "ExitSchedule", "PlanPoint", "calibrate_plan"]
