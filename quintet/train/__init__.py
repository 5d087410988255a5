"""Training: the language-model trainer and the multi-resolution vision trainer (`quintet.train.vision`)."""
