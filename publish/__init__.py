"""Putting a model to use: the CLI verbs that need model folders (formats/), kept out of pipeline/.

  export   a complete `step-N/` checkpoint -> a model folder that is also an MLflow Model (`distill export`)
  predict  labels and scores for lines of text through the MLflow Model a server would load (`distill predict`)
  cli      `distill export`, `distill predict`, `distill register`
"""
