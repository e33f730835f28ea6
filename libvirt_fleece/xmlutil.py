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


# For documents printed back (the hook's migrate filter): comments and PIs stay.
_PARSER_KEEP = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                               dtd_validation=False, huge_tree=False)


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


def parse(text: object, what: str, max_size: int = MAX_DOCUMENT,
          keep_comments: bool = False) -> etree._Element:
    """Parse an untrusted document. Raises InvalidArgument.

    Only UTF-8, no DOCTYPE (checked in the text and again in what libxml2
    parsed, so a declared UTF-7 cannot hide one), no entities, nothing fetched.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise errors.InvalidArgument(f"{what}: not UTF-8 text") from e
    if not isinstance(text, str):
        raise errors.InvalidArgument(f"{what}: expected an XML string, got {type(text).__name__}")
    if len(text) > max_size:
        raise errors.InvalidArgument(f"{what}: document larger than {max_size} bytes")
    if "\0" in text:
        raise errors.InvalidArgument(f"{what}: document contains a NUL character")
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise errors.InvalidArgument(f"{what}: DOCTYPE and entity declarations are not allowed")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise errors.InvalidArgument(
            f"{what}: text with invalid characters (lone surrogates)") from e
    try:
        root = etree.fromstring(data, _PARSER_KEEP if keep_comments else _PARSER)
    except (etree.XMLSyntaxError, ValueError) as e:
        raise errors.InvalidArgument(f"{what}: malformed XML: {e}") from e
    if root is None:
        raise errors.InvalidArgument(f"{what}: empty document")
    info = root.getroottree().docinfo
    # lxml-stubs 0.5.1 does not declare DocInfo.doctype (lxml has it since 2.0)
    if (info.doctype  # type: ignore[union-attr]
            or info.internalDTD is not None or info.externalDTD is not None):
        raise errors.InvalidArgument(f"{what}: DOCTYPE and entity declarations are not allowed")
    if (info.encoding or "UTF-8").upper().replace("_", "-") not in ("UTF-8", "UTF8"):
        raise errors.InvalidArgument(f"{what}: only UTF-8 documents are accepted, "
                                     f"not {info.encoding}")
    return root


def validate(root: etree._Element, schema: str, what: str) -> None:
    """Validate against ``xml-metadata/<schema>.rng``. Raises InvalidArgument."""
    rng = _schema(schema)
    if not rng.validate(root):
        err = rng.error_log.last_error
        detail = f"at {err.path}: {err.message}" if err else "does not match"
        raise errors.InvalidArgument(
            f"{what}: does not match the schema {schema}.rng ({detail})")


def required(el: etree._Element, attribute: str) -> str:
    """An attribute the schema requires, of a validated document. Raises InternalError."""
    value = el.get(attribute)
    if value is None:
        raise errors.InternalError(f"<{el.tag}> has no {attribute!r} attribute, which the "
                                   f"schema requires")
    return value


def tostring(root: etree._Element) -> str:
    return etree.tostring(root, pretty_print=True, encoding="unicode")


def strip_namespaces(root: etree._Element) -> etree._Element:
    """Drop namespaces in place (libvirt returns metadata with its prefix)."""
    for el in root.iter():
        if isinstance(el.tag, str):
            el.tag = etree.QName(el).localname
    etree.cleanup_namespaces(root)
    return root
