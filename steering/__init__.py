"""lmmscope: the steering stage."""
