"""Command help texts as Typer renders them well."""

from __future__ import annotations


def prose(text: str) -> str:
    """`text` with each prose paragraph on one line, for Typer to wrap at the terminal's width.

    Typer joins the lines of a help text's first paragraph but prints the later ones line by line,
    so a paragraph wrapped at 100 columns in the source came out broken at both 100 and the terminal's
    width. Paragraphs that are laid out on purpose are kept: indented ones (examples) and ones marked
    with click's no-rewrap escape (\\b)."""
    paragraphs = text.strip("\n").split("\n\n")
    kept = []
    for paragraph in paragraphs:
        lines = paragraph.split("\n")
        if paragraph.startswith("\b") or any(line[:1].isspace() for line in lines):
            kept.append(paragraph)
        else:
            kept.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(kept) + "\n"
