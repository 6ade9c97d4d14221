import KVMBackend
import RTVirtCore
import RTVirtGuestImage

let kvm = try KVMSystem()
let machine = try BundledGuestMachine(system: kvm, vcpus: [BundledGuestVCPU(mode: .compute, arguments: (10000000, 1))])
let cpu = machine.vcpus[0]
for _ in 0..<4 { print(try cpu.runOnce(), try cpu.systemRegisters().cs.dpl, String(try cpu.registers().rflags, radix: 16)) }
