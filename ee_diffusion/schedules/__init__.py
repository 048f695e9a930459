from .exit_schedule import DROP, REUSE, ExitSchedule, action_blocks, cached_tail, describe_action, reuses_work

__all__ = ["DROP", "REUSE", "ExitSchedule", "action_blocks", "cached_tail", "describe_action", "reuses_work"]
