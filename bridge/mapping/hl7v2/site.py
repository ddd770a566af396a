"""What a site knows about its own facilities, beyond what each message says.

``hl7v2/facilities.yaml`` (shipped empty, overlaid by a site) maps a sending facility
as departmental systems write it in MSH-4.1 (a namespace such as ``GZZS``) to the
organisation code and name it stands for; the controller's configuration supplies the
default for facilities the table does not list. :meth:`SiteContext.values_for` turns
both into the values ``{context: ...}`` rules of the mapping files read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from bridge.errors import LoadError
from bridge.mapping.yamlsrc import SourceMap, load_yaml
from bridge.resources import SHIPPED, MappingFiles

_CODE = re.compile(r"^[0-9A-Za-z-]{1,10}\Z")


@dataclass(frozen=True)
class Facility:
    code: str
    name: str


@dataclass(frozen=True)
class SiteContext:
    """The controller's own organisation (configuration) and the site's facility table."""

    organization_code: str | None = None
    organization_name: str | None = None
    facilities: dict[str, Facility] = field(default_factory=dict, hash=False, compare=False)

    def values_for(self, facility_id: str, facility_code: str) -> dict[str, str]:
        """Context values for a message from ``facility_id`` (MSH-4.1) with ``facility_code``
        (MSH-4.2, possibly empty)."""
        listed = self.facilities.get(facility_id)
        out: dict[str, str] = {}
        code = facility_code or (listed.code if listed else self.organization_code)
        name = listed.name if listed else self.organization_name
        if code:
            out["organization_code"] = code
        if name:
            out["organization_name"] = name
        return out

    def facility_key(self, facility_id: str, facility_code: str) -> str:
        """The organisation a message comes from, as visits are keyed: its code when known
        (MSH-4.2, the facility table, the configuration), else MSH-4.1 as sent."""
        return self.values_for(facility_id, facility_code).get("organization_code") \
            or facility_id


@lru_cache(maxsize=8)
def load_facilities(files: MappingFiles = SHIPPED) -> dict[str, Facility]:
    """``hl7v2/facilities.yaml`` (a site's when it has one); mistakes name file:line key."""
    path = files.file("hl7v2/facilities.yaml")
    if not path.is_file():
        return {}
    data = load_yaml(path)
    if not isinstance(data, SourceMap) or set(data) - {"facilities"}:
        raise LoadError("the file holds one key, facilities", location=str(path))
    table = data.get("facilities") or SourceMap()
    if not isinstance(table, SourceMap):
        raise LoadError("facilities must be a mapping", location=data.where("facilities"))
    out: dict[str, Facility] = {}
    for key, entry in table.items():
        if not isinstance(entry, SourceMap) or set(entry) != {"code", "name"}:
            raise LoadError("each facility is {code, name}", location=table.where(key))
        code, name = entry["code"], entry["name"]
        if not isinstance(code, str) or not _CODE.match(code):
            raise LoadError("code is an organisation code (up to 10 letters, digits, -)",
                            location=entry.where("code"))
        if not isinstance(name, str) or not name.strip() or len(name) > 70:
            raise LoadError("name is the organisation's name (1 to 70 characters)",
                            location=entry.where("name"))
        out[str(key)] = Facility(code, name.strip())
    return out
