"""Model access: load any supported model (`models`), address its layers (`layers`), read and patch a
layer's output (`hooks`), build its inputs from prompt templates (`inputs`), and say what every
position of a processed batch is (`token_map`)."""
