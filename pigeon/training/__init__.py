"""Training algorithms (foundation, stage 1, candidates, reward, DPO); their resumable state and
replayable data order live in :mod:`pigeon.training.checkpoint`."""
