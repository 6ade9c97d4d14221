// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "RTVirt",
    products: [
        .library(name: "RTVirtCore", targets: ["RTVirtCore"]),
        .library(name: "LongPoll", targets: ["LongPoll"]),
        .library(name: "RealtimeVCPU", targets: ["RealtimeVCPU"]),
        .library(name: "X86GuestSetup", targets: ["X86GuestSetup"]),
        .library(name: "KVMBackend", targets: ["KVMBackend"]),
        .library(name: "VMRPC", targets: ["VMRPC"]),
        .library(name: "CgroupScheduler", targets: ["CgroupScheduler"]),
        .library(name: "RTVirtTesting", targets: ["RTVirtTesting"]),
        .library(name: "RTVirtGuestImage", targets: ["RTVirtGuestImage"]),
        .library(name: "VMRPCSockets", targets: ["VMRPCSockets"]),
        .library(name: "PacketRing", targets: ["PacketRing"]),
        .library(name: "NetLatency", targets: ["NetLatency"]),
        .executable(name: "rtvirt", targets: ["rtvirt"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.5.0"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.4.0"),
    ],
    targets: [
        // MARK: C shims and system libraries (internal)
        .target(name: "CLinuxSupport"),
        .target(name: "CKVMShim"),
        // The freestanding guest header `rtvirt_vmrpc.h` (used by Guest/) plus host-side
        // wrappers that let the Swift tests check the C encoding against the test vectors.
        .target(name: "CVMRPCGuest"),
        // Socket calls of VMRPCSockets that Swift handles awkwardly (sockaddr, mmsghdr, setns).
        .target(name: "CSocketsSupport"),
        // SO_TIMESTAMPING control messages, the error queue and ethtool for NetLatency.
        .target(name: "CNetLatencySupport", dependencies: ["CSocketsSupport"]),
        .systemLibrary(
            name: "CLibcgroup",
            pkgConfig: "libcgroup",
            providers: [.apt(["libcgroup-dev"])]
        ),
        // zlib, for the compressed histograms of `rtvirt cyclictest --histogram-log`.
        .systemLibrary(
            name: "CZlib",
            pkgConfig: "zlib",
            providers: [.apt(["zlib1g-dev"])]
        ),
        .systemLibrary(
            name: "CLibnuma",
            pkgConfig: "numa",
            providers: [.apt(["libnuma-dev"])]
        ),

        // MARK: Feature modules
        .target(
            name: "RTVirtCore",
            dependencies: [
                "CLinuxSupport",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "KVMBackend",
            dependencies: [
                "RTVirtCore", "CKVMShim", "CLinuxSupport",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .target(
            name: "LongPoll",
            dependencies: [
                "RTVirtCore", "CLinuxSupport",
                .product(name: "SystemPackage", package: "swift-system"), .product(name: "Metrics", package: "swift-metrics"),
            ]
        ),
        .target(
            name: "RealtimeVCPU",
            dependencies: [
                "RTVirtCore", "CLinuxSupport",
                .product(name: "SystemPackage", package: "swift-system"), .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(name: "X86GuestSetup", dependencies: ["RTVirtCore"]),
        .target(
            name: "VMRPC",
            dependencies: [
                "RTVirtCore", "LongPoll",
                .product(name: "Logging", package: "swift-log"), .product(name: "Metrics", package: "swift-metrics"),
            ]
        ),
        .target(
            name: "CgroupScheduler",
            dependencies: [
                "RTVirtCore", "RealtimeVCPU", "CLibcgroup", "CLibnuma", "CLinuxSupport",
                .product(name: "SystemPackage", package: "swift-system"), .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(name: "RTVirtTesting", dependencies: ["RTVirtCore", "LongPoll"]),
        // The test targets' skips for absent host features (XCTest; not a product).
        .target(name: "RTVirtXCTestSupport", dependencies: ["RTVirtTesting", "KVMBackend"], path: "Tests/RTVirtXCTestSupport"),
        .target(name: "VMRPCSockets", dependencies: ["VMRPC", "RTVirtCore", "LongPoll", "CSocketsSupport"]),
        // Receive and transmit rings of datagrams in guest memory, filled by a VMM I/O thread that
        // raises an interrupt, drained through a doorbell: the conventional (virtio-net-shaped) path.
        .target(name: "PacketRing", dependencies: ["RTVirtCore", "VMRPC", "VMRPCSockets"]),
        // Probe-free network latency: a UDP tester with kernel timestamps in a namespace of its own.
        .target(name: "NetLatency", dependencies: ["RTVirtCore", "LongPoll", "VMRPCSockets", "CNetLatencySupport", "CSocketsSupport"]),

        // MARK: Fuzzing of the VMRPC server (Docs/Fuzzing.md)
        .target(name: "VMRPCFuzzHarness", dependencies: ["VMRPC", "RTVirtTesting", "RTVirtCore", "LongPoll", "VMRPCSockets"]),
        .executableTarget(name: "VMRPCFuzzer", dependencies: ["VMRPCFuzzHarness"]),
        .executableTarget(name: "VMRPCSocketsFuzzer", dependencies: ["VMRPCFuzzHarness"]),

        // MARK: The bundled guest, built from Guest/ by a build-tool plugin
        .executableTarget(name: "GuestImageEmbedder", path: "Plugins/GuestImageEmbedder"),
        .plugin(
            name: "GuestImageBuilder",
            capability: .buildTool(),
            dependencies: ["GuestImageEmbedder"]
        ),
        .target(
            name: "RTVirtGuestImage",
            dependencies: ["RTVirtCore", "KVMBackend", "VMRPC", "LongPoll", "X86GuestSetup", "PacketRing"],
            plugins: ["GuestImageBuilder"]
        ),

        // MARK: The tool
        .executableTarget(
            name: "rtvirt",
            dependencies: [
                "RTVirtCore", "LongPoll", "RealtimeVCPU", "X86GuestSetup", "KVMBackend", "VMRPC", "CgroupScheduler",
                "RTVirtGuestImage", "VMRPCSockets", "PacketRing", "NetLatency", "CLinuxSupport", "CZlib",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),

        // MARK: Tests
        .testTarget(name: "RTVirtCoreTests", dependencies: ["RTVirtCore", "RTVirtTesting"]),
        .testTarget(
            name: "LongPollTests",
            dependencies: ["LongPoll", "RTVirtCore", "RTVirtTesting", .product(name: "MetricsTestKit", package: "swift-metrics")]
        ),
        .testTarget(name: "RealtimeVCPUTests", dependencies: ["RTVirtXCTestSupport", "RealtimeVCPU", "RTVirtCore", "RTVirtTesting"]),
        .testTarget(name: "X86GuestSetupTests", dependencies: ["X86GuestSetup", "RTVirtCore", "KVMBackend", "RTVirtGuestImage", "PacketRing"]),
        .testTarget(
            name: "KVMBackendTests",
            dependencies: ["RTVirtXCTestSupport", "KVMBackend", "CKVMShim", "RTVirtCore", "LongPoll", "RealtimeVCPU", "X86GuestSetup", "VMRPC", "RTVirtTesting", "RTVirtGuestImage"]
        ),
        .testTarget(
            name: "VMRPCTests",
            dependencies: [
                "VMRPC", "LongPoll", "RTVirtTesting", "CVMRPCGuest", "VMRPCFuzzHarness",
                .product(name: "Logging", package: "swift-log"), .product(name: "MetricsTestKit", package: "swift-metrics"),
            ],
            exclude: ["FuzzCorpus"]
        ),
        .testTarget(
            name: "VMRPCSocketsTests",
            dependencies: ["RTVirtXCTestSupport", "VMRPCSockets", "VMRPC", "LongPoll", "RTVirtCore", "RTVirtTesting", "CVMRPCGuest", "VMRPCFuzzHarness",
                           "KVMBackend", "RTVirtGuestImage"]
        ),
        .testTarget(
            name: "NetLatencyTests",
            dependencies: ["RTVirtXCTestSupport", "NetLatency", "PacketRing", "VMRPCSockets", "VMRPC", "RTVirtCore", "RTVirtTesting", "KVMBackend",
                           "RTVirtGuestImage", "LongPoll"]
        ),
        .testTarget(name: "CgroupSchedulerTests", dependencies: ["RTVirtXCTestSupport", "CgroupScheduler", "RealtimeVCPU", "RTVirtTesting"]),
        .testTarget(name: "RTVirtTestingTests", dependencies: ["RTVirtTesting", "LongPoll"]),
        .testTarget(name: "IntegrationTests", dependencies: [
            "RTVirtXCTestSupport", "rtvirt", "CgroupScheduler", "KVMBackend", "RTVirtCore", "LongPoll", "RealtimeVCPU", "X86GuestSetup", "VMRPC",
            "RTVirtGuestImage", "RTVirtTesting", "VMRPCSockets", "PacketRing", "NetLatency", "CZlib",
            .product(name: "Histogram", package: "hdrhistogram-swift"),
        ]),
    ],
    swiftLanguageModes: [.v6]
)
