# expect-error: guest web: unknown option(s) autostart
{ root ? "/nonexistent" }:
import ../spec.nix {
  host = { uplink = "lo"; subnet4 = "10.0.0.0/24"; };
  # snake_case is the spec's spelling; the options are camelCase (autoStart).
  guests.web = { kind = "container"; index = 2; rootfs = "${root}/rootfs"; autostart = true; };
}
