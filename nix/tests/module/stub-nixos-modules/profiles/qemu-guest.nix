# Stand-in for nixpkgs' nixos/modules/profiles/qemu-guest.nix, the profile
# nix/module.nix's VM guests import: what nix/tests/module/eval.nix's guest
# evaluation finds at "${modulesPath}/profiles/qemu-guest.nix".
{
  boot.initrd.availableKernelModules = [ "virtio_net" "virtio_pci" "virtio_mmio" "virtio_blk" "virtio_scsi" ];
}
