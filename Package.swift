// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "RTVirt",
    platforms: [.macOS(.v13)],
    products: [
        .library(name: "RTVirtCore", targets: ["RTVirtCore"]),
        .library(name: "KVMBackend", targets: ["KVMBackend"]),
        .library(name: "VMRPC", targets: ["VMRPC"]),
        .library(name: "CgroupScheduler", targets: ["CgroupScheduler"]),
        .library(name: "RTVirtTesting", targets: ["RTVirtTesting"]),
        .library(name: "RTVirtGuestImage", targets: ["RTVirtGuestImage"]),
        .library(name: "VMRPCSockets", targets: ["VMRPCSockets"]),
        .executable(name: "rtvirt", targets: ["rtvirt"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
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
        .systemLibrary(
            name: "CLibcgroup",
            pkgConfig: "libcgroup",
            providers: [.apt(["libcgroup-dev"])]
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
        .target(name: "VMRPC", dependencies: ["RTVirtCore"]),
        .target(
            name: "CgroupScheduler",
            dependencies: ["RTVirtCore", "CLibcgroup", "CLibnuma", "CLinuxSupport"]
        ),
        .target(name: "RTVirtTesting", dependencies: ["RTVirtCore"]),
        .target(name: "VMRPCSockets", dependencies: ["VMRPC", "RTVirtCore", "CSocketsSupport"]),

        // MARK: Fuzzing of the VMRPC server (Docs/Fuzzing.md)
        .target(name: "VMRPCFuzzHarness", dependencies: ["VMRPC", "RTVirtTesting", "RTVirtCore", "VMRPCSockets"]),
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
            dependencies: ["RTVirtCore", "KVMBackend", "VMRPC"],
            plugins: ["GuestImageBuilder"]
        ),

        // MARK: The tool
        .executableTarget(
            name: "rtvirt",
            dependencies: [
                "RTVirtCore", "KVMBackend", "VMRPC", "CgroupScheduler", "RTVirtGuestImage", "VMRPCSockets",
                "CLinuxSupport",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),

        // MARK: Tests
        .testTarget(name: "RTVirtCoreTests", dependencies: ["RTVirtCore", "RTVirtTesting"]),
        .testTarget(
            name: "KVMBackendTests",
            dependencies: ["KVMBackend", "RTVirtCore", "RTVirtTesting", "RTVirtGuestImage"]
        ),
        .testTarget(
            name: "VMRPCTests",
            dependencies: ["VMRPC", "RTVirtTesting", "CVMRPCGuest", "VMRPCFuzzHarness"],
            exclude: ["FuzzCorpus"]
        ),
        .testTarget(
            name: "VMRPCSocketsTests",
            dependencies: ["VMRPCSockets", "VMRPC", "RTVirtCore", "RTVirtTesting", "CVMRPCGuest", "VMRPCFuzzHarness",
                           "KVMBackend", "RTVirtGuestImage"]
        ),
        .testTarget(name: "CgroupSchedulerTests", dependencies: ["CgroupScheduler"]),
        .testTarget(name: "RTVirtTestingTests", dependencies: ["RTVirtTesting"]),
        .testTarget(name: "IntegrationTests", dependencies: ["rtvirt", "CgroupScheduler", "KVMBackend", "RTVirtCore", "VMRPCSockets"]),
    ],
    swiftLanguageModes: [.v6]
)
