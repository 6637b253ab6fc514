"""Image -> feature: pretrained CNNs with their own preprocessing (encoders), the feature cache
(features), and training the CNN end to end (finetune)."""
