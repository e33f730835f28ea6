# SPDX-License-Identifier: LGPL-2.1-or-later
"""Safe XML parsing and RelaxNG validation against ``xml-metadata/``.

Parsing never resolves entities, never loads a DTD and never touches the
network; documents with a DOCTYPE are refused outright (no billion laughs,
no external entities).
"""

from __future__ import annotations

import functools
import os
import sys

from lxml import etree

from . import errors

MAX_DOCUMENT = 1 << 20

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                          dtd_validation=False, huge_tree=False, remove_comments=True,
                          remove_pis=True)


def schema_dir() -> str:
    """Where the RelaxNG schemas live (source tree, or installed data files)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(os.path.dirname(here), "xml-metadata"),
                      os.path.join(sys.prefix, "share", "libvirt-fleece", "xml-metadata")):
        if os.path.isdir(candidate):
            return candidate
    raise errors.InternalError("the RelaxNG schemas (xml-metadata/) are not installed")


@functools.lru_cache(maxsize=None)
def _schema(name: str) -> etree.RelaxNG:
    path = os.path.join(schema_dir(), name + ".rng")
    return etree.RelaxNG(etree.parse(path, _PARSER))


def parse(text: object, what: str) -> etree._Element:
    """Parse an untrusted document. Raises InvalidArgument."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise errors.InvalidArgument(f"{what}: not UTF-8 text") from e
    if not isinstance(text, str):
        raise errors.InvalidArgument(f"{what}: expected an XML string, got {type(text).__name__}")
    if len(text) > MAX_DOCUMENT:
        raise errors.InvalidArgument(f"{what}: document larger than {MAX_DOCUMENT} bytes")
    if "\0" in text:
        raise errors.InvalidArgument(f"{what}: document contains a NUL character")
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise errors.InvalidArgument(f"{what}: DOCTYPE and entity declarations are not allowed")
    try:
        root = etree.fromstring(text.encode("utf-8"), _PARSER)
    except etree.XMLSyntaxError as e:
        raise errors.InvalidArgument(f"{what}: malformed XML: {e}") from e
    if root is None:
        raise errors.InvalidArgument(f"{what}: empty document")
    return root


def validate(root: etree._Element, schema: str, what: str) -> None:
    """Validate against ``xml-metadata/<schema>.rng``. Raises InvalidArgument."""
    rng = _schema(schema)
    if not rng.validate(root):
        err = rng.error_log.last_error
        detail = f"at {err.path}: {err.message}" if err else "does not match"
        raise errors.InvalidArgument(
            f"{what}: does not match the schema {schema}.rng ({detail})")


def tostring(root: etree._Element) -> str:
    return etree.tostring(root, pretty_print=True, encoding="unicode")


def strip_namespaces(root: etree._Element) -> etree._Element:
    """Drop namespaces in place (libvirt returns metadata with its prefix)."""
    for el in root.iter():
        if isinstance(el.tag, str):
            el.tag = etree.QName(el).localname
    etree.cleanup_namespaces(root)
    return root
