"""noisy_student_nnunet: the noisy nnU-Net student (Koehler, Isensee, Maier-Hein; FLARE 2022) as an nnU-Net v2 plugin.

This module is imported at every interpreter start (through the registration hook), so it stays
light: no torch, no nnU-Net imports here.
"""

__version__ = "0.1.0"
