"""heal/: repair a pruned model, one module per method behind one `run.heal()`.

- `config`: the methods and `HealConfig`, checked before any work;
- `validation`: every check of a heal request (checkpoint, data, teacher, resume);
- `training`: QLoRA/LoRA with the transformers Trainer (method `lora`);
- `distill`: logit distillation from the unpruned teacher (`distill`);
- `linear_fit`, `linear_patch`: the training-free least-squares patch (`linear`);
- `checkpoints`: resumable training checkpoints; `outputs`: adapter, merge, model card.

May import: method, models, store, errors (not evaluate, its sibling).
"""
