"""Model definitions: one decoder (`decoder`) configured per family by `config.ModelConfig`."""
