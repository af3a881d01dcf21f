# expect-error: group edge: unknown option(s) members
{ root ? "/nonexistent" }:
import ../spec.nix {
  host = { uplink = "lo"; subnet4 = "10.0.0.0/24"; };
  guests = { };
  groups.edge = { replicas = 2; indexBase = 10; members = [ "a" "b" ]; };
}
