"""umc.passes (placeholder package; filled by later issues)."""
