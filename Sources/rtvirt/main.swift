import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import Foundation
let kvm = try KVMSystem()
let machine = try BundledGuestMachine(system: kvm, vcpus: [BundledGuestVCPU(mode: .compute, arguments: (10, 1))])
print(try String(contentsOfFile: "/proc/self/maps", encoding: .utf8))
print(machine.vm.guestMemory.regions[0].mapping.pointer)
