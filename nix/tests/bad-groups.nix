# expect-error: groups (edge) are not supported by this berth yet
{ root ? "/nonexistent" }:
import ../spec.nix {
  host = { uplink = "lo"; subnet4 = "10.0.0.0/24"; };
  guests = { };
  groups.edge = { members = [ "a" "b" ]; };
}
