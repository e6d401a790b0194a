"""Networks: ResNet backbones, the CAM classifier and DeepLab."""
