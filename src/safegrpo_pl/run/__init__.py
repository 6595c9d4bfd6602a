"""Running it: the Trainer CLI, console, run folders, preemption, exports, reports and curves."""
