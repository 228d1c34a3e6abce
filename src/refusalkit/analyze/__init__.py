"""Paper B's analysis (several refusal directions, their geometry, one shared trade-off,
styles) as a pipeline of named stages. Entry point: `refusalkit.analyze.pipeline.analyze`."""
