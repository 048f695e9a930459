from .exit_schedule import REUSE, ExitSchedule

__all__ = ["REUSE", "ExitSchedule"]
