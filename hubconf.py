"""torch.hub entry points (the logic lives in stage2_student_distill/hub.py).

    torch.hub.load(REPO, "meal_v2", "mealv2_resnest50")                  # released MEAL V2 weights
    torch.hub.load(REPO, "meal_v2", "mealv2_efficientnet_b0", pretrained="/path/MEALV2_EfficientNet_B0_224.pth")
    torch.hub.load(REPO, "meal_v2_checkpoint", "runs/student/best.pt")   # a student distilled here

REPO is "OWNER/NAME" on GitHub, or this directory with source="local".
Runs on CPU-only machines; see ``help(meal_v2)`` for the names and options.
"""
dependencies = ["torch", "timm", "safetensors"]

from stage2_student_distill.hub import meal_v2, meal_v2_checkpoint  # noqa: E402

__all__ = ["meal_v2", "meal_v2_checkpoint"]
