"""The converted model: HLAConfig, the HLA attention core and its dispatch table, attention-mode
switching, surgery on diffusers attention modules, token grids, masks, LoRA, block streaming,
FLOPs, and loading diffusers models. Imports hla_convert.ops and the bottom utilities only
(docs/architecture.md)."""
