"""l2c.trainer.vision: the vision tower, the text adapter on cached vectors, the CLIP loss and the training loop."""
