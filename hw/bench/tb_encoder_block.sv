// The Verilator (`--binary`, or Icarus) bench of one Transformer block on tqt_block_engine: the
// scratchpad image (weights, biases, gammas, betas, the block's input) and the program come from
// hw/block.py; after the run the scratchpad is written back for hw/block.py to compare every op's
// output with the golden vectors. Plusargs: +image= +program= +out= (files), +words= (the image's
// size). Prints `cycles N`.
module tb_encoder_block #(
    parameter int WORDS = 1 << 20,  // the scratchpad's size
    parameter int OPS = 64,         // the most instructions a program may have
    parameter int LANES = 16, parameter int ADDR_W = 24, parameter int ROUNDING = 2,
    parameter int ACT_W = 8, parameter int W_W = 8, parameter int ACC_W = 32, parameter int RES_W = 16,
    parameter int SUM_W = 40,
    parameter int LN_D = 64, parameter int LN_ADDR_W = 6, parameter int LN_GAMMA_W = 16,
    parameter int LN_BETA_W = 49, parameter int LN_EPS_W = 33, parameter int LN_K = 24, parameter int LN_F = 16,
    parameter int LN_S_W = 23, parameter int LN_SQ_W = 37, parameter int LN_W_W = 43, parameter int LN_C_W = 23,
    parameter int LN_NUM_W = 44, parameter int LN_N_Q_W = 20, parameter int LN_Y_W = 40,
    parameter bit LN_RECIPROCAL = 0, parameter int LN_G = 24,
    parameter int SM_LEN_W = 8, parameter int SM_SC_W = 22, parameter int SM_X_W = 24, parameter int SM_XF_W = 27,
    parameter int SM_Z_IN_W = 26, parameter int SM_Z_W = 9, parameter int SM_L_W = 38, parameter int SM_S_W = 47,
    parameter int SM_B_P = 8, parameter int SM_MAX_LEFT = 0, parameter longint SM_Q_LN2 = 64'd181704,
    parameter longint SM_Q_B = 64'd354684, parameter longint SM_Q_C = 64'd66012017480,
    parameter longint SM_MAGIC = 0, parameter int SM_MAGIC_S = 0, parameter bit SM_RECIPROCAL = 0
);
  logic clk = 0, rst = 1, start = 0, done;
  logic signed [63:0] scratch [WORDS];
  logic [16*64-1:0] program_words [OPS];
  logic [15:0] pc;
  logic [16*64-1:0] instruction;
  logic [ADDR_W-1:0] rd_a_addr;
  logic signed [63:0] rd_a;
  logic [LANES*ADDR_W-1:0] rd_b_addr, rd_c_addr, wr_addr;
  logic [LANES*64-1:0] rd_b, rd_c, wr_data;
  logic [LANES-1:0] wr_en;
  string image_file, program_file, out_file;
  int cycles = 0;

  tqt_block_engine #(.LANES(LANES), .ADDR_W(ADDR_W), .ROUNDING(ROUNDING), .ACT_W(ACT_W), .W_W(W_W), .ACC_W(ACC_W),
                     .RES_W(RES_W), .SUM_W(SUM_W), .LN_D(LN_D), .LN_ADDR_W(LN_ADDR_W), .LN_GAMMA_W(LN_GAMMA_W),
                     .LN_BETA_W(LN_BETA_W), .LN_EPS_W(LN_EPS_W), .LN_K(LN_K), .LN_F(LN_F), .LN_S_W(LN_S_W),
                     .LN_SQ_W(LN_SQ_W), .LN_W_W(LN_W_W), .LN_C_W(LN_C_W), .LN_NUM_W(LN_NUM_W),
                     .LN_N_Q_W(LN_N_Q_W), .LN_Y_W(LN_Y_W), .LN_RECIPROCAL(LN_RECIPROCAL), .LN_G(LN_G), .SM_LEN_W(SM_LEN_W), .SM_SC_W(SM_SC_W), .SM_X_W(SM_X_W),
                     .SM_XF_W(SM_XF_W), .SM_Z_IN_W(SM_Z_IN_W), .SM_Z_W(SM_Z_W), .SM_L_W(SM_L_W), .SM_S_W(SM_S_W),
                     .SM_B_P(SM_B_P), .SM_MAX_LEFT(SM_MAX_LEFT), .SM_Q_LN2(SM_Q_LN2), .SM_Q_B(SM_Q_B),
                     .SM_Q_C(SM_Q_C), .SM_MAGIC(SM_MAGIC), .SM_MAGIC_S(SM_MAGIC_S), .SM_RECIPROCAL(SM_RECIPROCAL))
      engine (.clk(clk), .rst(rst), .start(start), .pc(pc), .instruction(instruction), .rd_a_addr(rd_a_addr),
              .rd_a(rd_a), .rd_b_addr(rd_b_addr), .rd_b(rd_b), .rd_c_addr(rd_c_addr), .rd_c(rd_c), .wr_en(wr_en),
              .wr_addr(wr_addr), .wr_data(wr_data), .done(done));

  // the scratchpad: reads answered one cycle after the address, up to LANES writes a cycle
  always_ff @(posedge clk) begin
    instruction <= program_words[pc];
    rd_a <= scratch[rd_a_addr];
    for (int l = 0; l < LANES; l++) begin
      rd_b[l*64 +: 64] <= scratch[rd_b_addr[l*ADDR_W +: ADDR_W]];
      rd_c[l*64 +: 64] <= scratch[rd_c_addr[l*ADDR_W +: ADDR_W]];
      if (wr_en[l]) scratch[wr_addr[l*ADDR_W +: ADDR_W]] <= wr_data[l*64 +: 64];
    end
  end

  always #1 clk = ~clk;
  always @(posedge clk) cycles <= cycles + 1;

  initial begin
    if (!$value$plusargs("image=%s", image_file) || !$value$plusargs("program=%s", program_file)
        || !$value$plusargs("out=%s", out_file)) begin
      $display("usage: +image= +program= +out=");
      $finish;
    end
    $readmemh(image_file, scratch);
    $readmemh(program_file, program_words);
    repeat (2) @(negedge clk);
    rst = 0;
    start = 1;
    @(negedge clk);
    start = 0;
    @(posedge done);
    repeat (2) @(negedge clk);
    $writememh(out_file, scratch);
    $display("cycles %0d", cycles);
    $finish;
  end
endmodule
