"""MkDocs hook: the placeholder ``<!-- certify operators -->`` in a page becomes the table
``certify operators`` prints, generated from the registries at every build, so the
documented operators are always the code's (``certify.cli.operators``)."""

from certify.cli.operators import table

PLACEHOLDER = "<!-- certify operators -->"


def on_page_markdown(markdown, page, config, files):
    return markdown.replace(PLACEHOLDER, table())
