{
  description = "berth: declarative VMs and containers for Linux hosts (NixOS first)";

  # The workspace needs rustc >= 1.88 (edition 2024; hadris-iso 2.5 asks
  # for 1.88): nixos-25.05 has 1.86, so nixos-25.11.
  # No flake.lock is committed yet: `nix flake lock` creates one.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      # berth runs qemu-system-x86_64, so x86_64 hosts only for now.
      systems = [ "x86_64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # What berth runs: systemd-nspawn, nft, ip, qemu-system-x86_64 and
      # qemu-img, mount/nsenter. Appended to PATH (--suffix), so a NixOS
      # host's own systemd-nspawn (matching the running systemd) wins.
      runtimeDeps = pkgs: with pkgs; [ systemd nftables iproute2 qemu_kvm util-linux ];

      mkBerth = pkgs: pkgs.rustPlatform.buildRustPackage {
        pname = "berth";
        version = (lib.importTOML ./Cargo.toml).workspace.package.version;
        src = lib.cleanSourceWith {
          src = ./.;
          filter = path: type:
            let base = baseNameOf path; in
            !(lib.hasPrefix "target" base) && base != ".git" && base != "result";
        };
        cargoLock.lockFile = ./Cargo.lock;
        cargoBuildFlags = [ "-p" "berth" ];
        nativeBuildInputs = [ pkgs.makeWrapper ];
        # crates/container/build.rs links the static berth-init helper
        # (+crt-static): it needs the static C library.
        buildInputs = [ pkgs.glibc.static ];
        # Unit tests need nothing special, but the e2e tests need root,
        # network namespaces and QEMU: scripts/test.sh runs them all in CI.
        doCheck = false;
        postInstall = ''
          wrapProgram $out/bin/berth --suffix PATH : ${lib.makeBinPath (runtimeDeps pkgs)}
        '';
        meta = {
          description = "Declarative VMs and containers for Linux hosts";
          license = lib.licenses.asl20;
          platforms = lib.platforms.linux;
          mainProgram = "berth";
        };
      };
    in
    {
      packages = forAllSystems (pkgs: rec {
        default = mkBerth pkgs;
        berth = default;
      });

      # The module with its package defaulting to this flake's build; the
      # bare module (package to be set by the user) is nixosModules.berth.
      nixosModules.default = { lib, pkgs, ... }: {
        imports = [ ./nix/module.nix ];
        services.berth.package =
          lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };
      nixosModules.berth = import ./nix/module.nix;

      # NixOS VM test: one container and one microVM, both declared with a
      # NixOS `config`, must answer; then a new spec adds a guest and the
      # container keeps its leader PID (not restarted by the activation).
      # Needs a NixOS (or Nix) machine with nixpkgs and KVM:
      #   nix build .#checks.x86_64-linux.vm-test -L
      # It is NOT run in berth's CI (Debian, no nixpkgs), which only checks
      # nix/spec.nix and parses every .nix file (crates/berth/tests/nix_module.rs).
      checks = forAllSystems (pkgs: {
        vm-test = pkgs.testers.nixosTest {
          name = "berth";
          nodes.machine = { pkgs, ... }: {
            imports = [ self.nixosModules.default ];
            virtualisation = { memorySize = 4096; cores = 2; diskSize = 8192; };
            environment.systemPackages = [ pkgs.jq pkgs.curl ];
            services.berth = {
              enable = true;
              host = { uplink = "eth0"; subnet4 = "10.0.0.0/24"; subnet6 = "fd42:b:e:1::/64"; };
              guests.web = {
                kind = "container";
                index = 2;
                memory = "512M";
                config = { pkgs, ... }: {
                  networking.firewall.allowedTCPPorts = [ 80 ];
                  systemd.services.hello = {
                    wantedBy = [ "multi-user.target" ];
                    script = "cd /etc && exec ${pkgs.python3}/bin/python3 -m http.server 80";
                  };
                };
              };
              guests.micro = {
                kind = "vm";
                index = 3;
                memory = "512M";
                # Nested KVM is often missing in CI VMs; auto falls back to TCG.
                accel = "auto";
                config = { };
              };
            };
            specialisation.more.configuration = {
              services.berth.guests.extra = {
                kind = "container";
                index = 4;
                config = { };
              };
            };
          };
          testScript = { nodes, ... }: ''
            machine.wait_for_unit("berth.service")
            machine.wait_for_unit("berth-apply.service")
            machine.wait_until_succeeds("ping -c1 -W1 10.0.0.2", timeout=120)
            machine.wait_until_succeeds("curl -sf http://10.0.0.2/os-release", timeout=120)
            machine.wait_until_succeeds("ping -c1 -W1 10.0.0.3", timeout=600)
            machine.succeed("machinectl list | grep berth-web")
            pid = machine.succeed("berth ps --json | jq -r '.[] | select(.name == \"web\") | .pid'").strip()
            machine.succeed("${nodes.machine.system.build.toplevel}/specialisation/more/bin/switch-to-configuration test")
            machine.wait_until_succeeds("ping -c1 -W1 10.0.0.4", timeout=120)
            after = machine.succeed("berth ps --json | jq -r '.[] | select(.name == \"web\") | .pid'").strip()
            assert pid == after, f"web was restarted by an unrelated change: {pid} -> {after}"
            # The daemon restarts without taking the guests along.
            machine.succeed("systemctl restart berth.service")
            machine.wait_for_unit("berth.service")
            machine.succeed("ping -c1 -W1 10.0.0.2")
          '';
        };
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.default ];
          packages = (runtimeDeps pkgs) ++ (with pkgs; [ rustfmt clippy rust-analyzer nix curl ]);
        };
      });
    };
}
