import CKVMShim
import RTVirtCore

// Conversions between RTVirtCore's x86 state types and the kernel's structures.

extension X86Registers {
    init(_ r: kvm_regs) {
        self.init()
        rax = r.rax; rbx = r.rbx; rcx = r.rcx; rdx = r.rdx
        rsi = r.rsi; rdi = r.rdi; rsp = r.rsp; rbp = r.rbp
        r8 = r.r8; r9 = r.r9; r10 = r.r10; r11 = r.r11
        r12 = r.r12; r13 = r.r13; r14 = r.r14; r15 = r.r15
        rip = r.rip; rflags = r.rflags
    }

    var kernelRegisters: kvm_regs {
        var r = kvm_regs()
        r.rax = rax; r.rbx = rbx; r.rcx = rcx; r.rdx = rdx
        r.rsi = rsi; r.rdi = rdi; r.rsp = rsp; r.rbp = rbp
        r.r8 = r8; r.r9 = r9; r.r10 = r10; r.r11 = r11
        r.r12 = r12; r.r13 = r13; r.r14 = r14; r.r15 = r15
        r.rip = rip; r.rflags = rflags
        return r
    }
}

extension X86Segment {
    init(_ s: kvm_segment) {
        self.init(
            base: s.base, limit: s.limit, selector: s.selector, type: s.type, present: s.present != 0,
            dpl: s.dpl, defaultSize32: s.db != 0, codeOrData: s.s != 0, longMode: s.l != 0,
            granularity: s.g != 0, available: s.avl != 0, unusable: s.unusable != 0)
    }

    var kernelSegment: kvm_segment {
        var s = kvm_segment()
        s.base = base; s.limit = limit; s.selector = selector; s.type = type
        s.present = present ? 1 : 0; s.dpl = dpl; s.db = defaultSize32 ? 1 : 0
        s.s = codeOrData ? 1 : 0; s.l = longMode ? 1 : 0; s.g = granularity ? 1 : 0
        s.avl = available ? 1 : 0; s.unusable = unusable ? 1 : 0
        return s
    }
}

extension X86SystemRegisters {
    init(_ s: kvm_sregs) {
        self.init()
        cs = X86Segment(s.cs); ds = X86Segment(s.ds); es = X86Segment(s.es)
        fs = X86Segment(s.fs); gs = X86Segment(s.gs); ss = X86Segment(s.ss)
        tr = X86Segment(s.tr); ldt = X86Segment(s.ldt)
        gdt = X86DescriptorTable(base: s.gdt.base, limit: s.gdt.limit)
        idt = X86DescriptorTable(base: s.idt.base, limit: s.idt.limit)
        cr0 = s.cr0; cr2 = s.cr2; cr3 = s.cr3; cr4 = s.cr4; cr8 = s.cr8
        efer = s.efer; apicBase = s.apic_base
    }

    /// Writes these registers into `s`, leaving the interrupt bitmap as it is.
    func apply(to s: inout kvm_sregs) {
        s.cs = cs.kernelSegment; s.ds = ds.kernelSegment; s.es = es.kernelSegment
        s.fs = fs.kernelSegment; s.gs = gs.kernelSegment; s.ss = ss.kernelSegment
        s.tr = tr.kernelSegment; s.ldt = ldt.kernelSegment
        s.gdt.base = gdt.base; s.gdt.limit = gdt.limit
        s.idt.base = idt.base; s.idt.limit = idt.limit
        s.cr0 = cr0; s.cr2 = cr2; s.cr3 = cr3; s.cr4 = cr4; s.cr8 = cr8
        s.efer = efer; s.apic_base = apicBase
    }
}
