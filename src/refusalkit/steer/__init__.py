"""Refusal Steering (paper A) as a pipeline of named stages: config, data splits, fitting,
search, choice, held-out evaluation against baselines, report. Entry point:
`refusalkit.steer.pipeline.run_steer`."""
