"""lmmscope: the explain stage."""
