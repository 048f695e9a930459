from .throughput import Timing, time_interleaved

__all__ = ["Timing", "time_interleaved"]
