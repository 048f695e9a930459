from .calibration import Calibration, PlanCalibrator, PlanPoint, calibrate_plan
from .exit_schedule import REUSE, ExitSchedule

__all__ = ["REUSE", "Calibration", "ExitSchedule", "PlanCalibrator", "PlanPoint", "calibrate_plan"]
