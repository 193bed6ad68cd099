"""What the small interop scripts share: counting checks, creating a token through the admin API,
and reporting to the file scripts/interop-test sums up (INTEROP_RESULTS)."""

import json
import os
import sys
import urllib.request


class Checks:
    def __init__(self, name):
        self.name, self.passed, self.failed = name, 0, 0

    def check(self, what, ok, detail=""):
        if ok:
            self.passed += 1
            print(f"ok    {what}")
        else:
            self.failed += 1
            print(f"FAIL  {what} {detail}")

    def finish(self):
        """Appends "<name> <passed> <failed>" to INTEROP_RESULTS and exits 1 on any failure."""
        results = os.environ.get("INTEROP_RESULTS")
        if results:
            with open(results, "a") as f:
                f.write(f"{self.name} {self.passed} {self.failed}\n")
        print(f"{self.name}: {self.passed} passed, {self.failed} failed")
        sys.exit(1 if self.failed else 0)


def create_token(admin_url, root_key, body):
    """POST /admin/v1/tokens; the answer (with the token's secret)."""
    req = urllib.request.Request(
        admin_url + "/admin/v1/tokens", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": "Bearer " + root_key, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)
