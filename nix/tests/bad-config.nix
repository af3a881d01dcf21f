# expect-error: guest web: `config` is a NixOS configuration and needs nixpkgs to build
{ root ? "/nonexistent" }:
import ../spec.nix {
  host = { uplink = "lo"; subnet4 = "10.0.0.0/24"; };
  guests.web = { kind = "container"; index = 2; config = { services.nginx.enable = true; }; };
}
