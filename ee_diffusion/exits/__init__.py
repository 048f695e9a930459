from .architectures import ExitArchitecture, get_exit_architecture, register_exit_architecture
from .hooks import (
    ExitCall,
    ExitStats,
    apply_exit_schedule,
    denoiser_of,
    exit_units,
    get_exit_schedule,
    get_exit_stats,
    num_exit_blocks,
    remove_exit_schedule,
    reset_exit_stats,
    set_exit_timestep_scale,
)

__all__ = [
    "ExitArchitecture",
    "ExitCall",
    "ExitStats",
    "apply_exit_schedule",
    "denoiser_of",
    "exit_units",
    "get_exit_architecture",
    "get_exit_schedule",
    "get_exit_stats",
    "num_exit_blocks",
    "register_exit_architecture",
    "remove_exit_schedule",
    "reset_exit_stats",
    "set_exit_timestep_scale",
]
