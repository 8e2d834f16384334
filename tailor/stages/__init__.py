"""The stages of tailor.pipeline, one module each: calibrate (the data), cost (the cost model,
fitted where the target was measured here), search (plan and refit, measured on held-out
data), artifact (the Compiled result, saving and loading), log (stage times and memory)."""
