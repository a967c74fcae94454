"""umc.runtime (placeholder package; filled by later issues)."""
