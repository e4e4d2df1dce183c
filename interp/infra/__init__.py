"""Shared infrastructure: the run directory's layout (`layout`), checkpoints (`checkpoint`), the one
append-only record store (`records`), the one resume identity check (`identity`), run records
(`runinfo`) and the dataclass-to-CLI generator (`cli_config`)."""
