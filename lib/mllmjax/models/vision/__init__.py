"""Vision-language models: vision towers (`tower`: CLIP and SigLIP ViT encoders) and the models that
put a tower's image features into a decoder family's text embeddings (`llava`, `gemma3_vision`), on
what they share (`vlm`).

A tower declares, like a decoder family: its config (`tower.VisionConfig` subclasses, read by
`tower.config_from_hf` from an HF vision config), its params (`param_specs`), its HF name table
(`tower.HF_NAMES`, loaded through `mllmjax.weights.table`) and its forward (`tower.hidden_states`).
A vision-language module declares `ARCHITECTURES`, `MODEL_TYPES`, `Config`, `config_from_hf`,
`param_specs`, `params_from_hf` (its checkpoint split into tower, projector and text model, each
loaded through its own table: `vlm.params_from_hf`), `hf_tensors_from_params` (export), and its two
forward pieces `tower_features` and `project_features`, which `vlm.forward` / `vlm.logits` and
`vlm.prompt_embeds` (a prompt's input embeddings with its images in place, from which
`sampling.generate_embeds` decodes) call by the config's family; it is listed in
`mllmjax.models.registry.VISION_LANGUAGE`, which `convert` and `export` dispatch on.
"""
