"""Image classification: ImageFolder data, the task's hooks into the engine, evaluation."""
