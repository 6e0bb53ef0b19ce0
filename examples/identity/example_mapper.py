#!/usr/bin/python3
"""An example external identity-mapping program (external_identity_mapping#1.0.0).

Reads {"DATA_TYPE": "identity_mapping_input#1.0.0", "identities": [...]} on stdin and
answers {"DATA_TYPE": "identity_mapping_output#1.0.0", "result": [{"id", "output"}]}
on stdout. It maps ``NAME@DOMAIN`` usernames (DOMAIN given with --domain) to
``PREFIXNAME`` when NAME is a short lower-case word, and leaves every other identity
out of the answer (not mapped). A real site would look the identity up in LDAP or a
database here. Exit status 0 on success; anything else makes mep refuse the mapping.
"""

import argparse
import json
import re
import sys

LOCAL_PART = re.compile(r"[a-z][a-z0-9]{0,15}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--domain", required=True)
    parser.add_argument("--prefix", default="")
    args = parser.parse_args()
    request = json.load(sys.stdin)
    if request.get("DATA_TYPE") != "identity_mapping_input#1.0.0":
        print("unexpected input document", file=sys.stderr)
        return 1
    result = []
    for identity in request["identities"]:
        username = identity.get("username")
        if not isinstance(username, str) or "@" not in username:
            continue
        local, domain = username.rsplit("@", 1)
        if domain == args.domain and LOCAL_PART.fullmatch(local):
            result.append({"id": identity["id"], "output": args.prefix + local})
    json.dump({"DATA_TYPE": "identity_mapping_output#1.0.0", "result": result}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
