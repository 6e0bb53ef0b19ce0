"""mkdocs hook: links from a page to files of the repository outside docs/.

The guides link to files such as ``../policies/README.md`` that are right on GitHub and
in a checkout but are not part of the site. mkdocs would warn about each (and the build
runs with ``--strict``); here a link that leaves docs/ and names a file that exists in
the repository becomes its text followed by the repository path in code, so a reader of
the site knows where to look. A link that leaves docs/ and names nothing that exists is
left alone: mkdocs reports it, and the build fails as it should.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# [text](target) or [text](target#anchor), not images; targets without spaces.
_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent
    here = (docs / page.file.src_path).parent

    def rewrite(match: re.Match[str]) -> str:
        target = match["target"]
        if "://" in target or target.startswith(("/", "mailto:")):
            return match[0]
        resolved = (here / target).resolve()
        if resolved.is_relative_to(docs) or not resolved.is_relative_to(repo):
            return match[0]
        if not resolved.exists():
            return match[0]
        path = resolved.relative_to(repo).as_posix()
        text = match["text"]
        return text if text.strip("`") == path else f"{text} (`{path}` in the repository)"

    return _LINK.sub(rewrite, markdown)
