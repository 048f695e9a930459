from .exit_schedule import ExitSchedule

__all__ = ["ExitSchedule"]
