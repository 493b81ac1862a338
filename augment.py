"""Image and text augmentations: the weak and strong views of CLIP 🚀 (SPEC.md section 3)."""
import html

import ftfy
import regex as re


# --- Text cleaning ---
def clean_text(text):
    """ftfy fix, HTML-unescape twice, collapse whitespace, lowercase (CLIP's tokenizer cleaning)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r'\s+', ' ', text).strip().lower()
