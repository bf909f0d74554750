"""Implicit CoT via Knowledge Distillation (ICoT-KD; Deng et al. 2023).

An explicit-CoT teacher's "horizontal" reasoning, read from its hidden states along the CoT, is
distilled into "vertical" reasoning across the layers of models that read only the input:

- teacher (`states`): hidden states entering layer l at CoT position t_l, normalised;
- (a) mind-reading student (`modules.MindReadingStudent`): answers from those states at SEP;
- (b) thought emulator (`modules.ThoughtEmulator`): predicts them from the input alone;
- (c) coupled model (`modules.CoupledModel`): emulator + student, fine-tuned on answers only.

`pipeline.KDTrainer` runs the whole pipeline (or one stage) on the shared training loop;
`predictor.load_kd_predictor` loads a saved model. Nothing is imported here, so that reading a
saved model's settings (metadata.py) does not import the training loop.
"""
